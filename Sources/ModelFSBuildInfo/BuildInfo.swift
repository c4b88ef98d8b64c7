/// What this binary is: its version and the commit it was built from (BuildInfoPlugin writes
/// `buildCommit` before each build).
public enum BuildInfo {
    public static let version = "0.9.0"
    public static var commit: String { buildCommit }
    /// "0.9.0 (commit 1a2b3c4d5e6f)".
    public static var description: String { "\(version) (commit \(commit))" }
}
