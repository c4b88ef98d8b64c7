import Foundation
import PackagePlugin

/// Names the commit a binary was built from (`modelfs --version`, the daemon's log): a build
/// command that runs `git rev-parse` into BuildInfo+Commit.swift whenever the checkout's HEAD
/// log or index changes (a commit, a checkout, `git add`; `+changes` when the tree then differs
/// from HEAD: an edit git has not looked at yet is not noticed), and never otherwise, so an
/// unchanged tree recompiles nothing. Outside a git checkout the commit is
/// "unknown". (A prebuild command would run on every build, but SwiftPM skips plugins when it
/// reuses its build plan, which left a stale commit.)
@main
struct BuildInfoPlugin: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let root = context.package.directoryURL
        let output = context.pluginWorkDirectoryURL.appendingPathComponent("BuildInfo+Commit.swift")
        let git = root.appendingPathComponent(".git")
        let inputs = ["logs/HEAD", "HEAD", "index"].map { git.appendingPathComponent($0) }
            .filter { FileManager.default.fileExists(atPath: $0.path) }
        let script = """
            c=$(git -C "$0" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
            [ "$c" = unknown ] || git -C "$0" diff --quiet HEAD -- 2>/dev/null || c="$c+changes"
            printf 'let buildCommit = "%s"\\n' "$c" > "$1"
            """
        return [.buildCommand(displayName: "modelfs: the commit being built",
                              executable: URL(fileURLWithPath: "/bin/sh"),
                              arguments: ["-c", script, root.path, output.path],
                              inputFiles: inputs, outputFiles: [output])]
    }
}
