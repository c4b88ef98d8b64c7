import Foundation
import PackagePlugin

/// Names the commit a binary was built from (`modelfs --version`, the daemon's log): before each
/// build, `git rev-parse` into BuildInfo+Commit.swift, rewritten only when it changes (so an
/// unchanged tree recompiles nothing). Outside a git checkout the commit is "unknown".
@main
struct BuildInfoPlugin: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let out = context.pluginWorkDirectoryURL
        let script = """
            c=$(git -C "$0" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
            git -C "$0" diff --quiet HEAD -- 2>/dev/null || [ "$c" = unknown ] || c="$c+changes"
            f="$1/BuildInfo+Commit.swift"
            t="let buildCommit = \\"$c\\""
            [ "$(cat "$f" 2>/dev/null)" = "$t" ] || printf '%s\\n' "$t" > "$f"
            """
        return [.prebuildCommand(displayName: "modelfs: the commit being built",
                                 executable: URL(fileURLWithPath: "/bin/sh"),
                                 arguments: ["-c", script, context.package.directoryURL.path, out.path],
                                 outputFilesDirectory: out)]
    }
}
