import ArgumentParser
import Foundation

struct UmountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "umount",
        abstract: "Unmount a modelfs mount and wait for its daemon to finish.",
        discussion: "Refuses while files are open on the mount, unless --force (a lazy unmount: the daemon exits once the last file is closed).")

    @Argument(help: "The mountpoint.")
    var mountpoint: String

    @Flag(help: "Unmount even if files are open (lazy unmount).")
    var force = false

    func run() throws {
        let mp = canonicalPath(mountpoint)
        let record = Registry.load(mp)
        let mounted = MountTable.fsType(at: mp)
        guard mounted == "fuse.modelfs" else {
            if let record { Registry.remove(record.mountpoint) }
            throw fail("\(mp) is not mounted by modelfs")
        }
        if let record, !force {
            // The kernel releases a closed file asynchronously: give a close() that just returned
            // a moment to arrive before counting it as open.
            var open = openHandles(record)
            let settle = Date().addingTimeInterval(1)
            while open > 0 && Date() < settle {
                usleep(20_000)
                open = openHandles(record)
            }
            if open > 0 {
                throw fail("refusing to unmount \(mp): \(open) file(s) are open on it; close them, or use --force")
            }
        }
        if umount2(mp, force ? Int32(MNT_DETACH) : 0) != 0 {
            let e = errno
            if e == EPERM || e == EACCES {
                // Not root: let the setuid helper unmount it.
                let p = Process()
                p.executableURL = URL(fileURLWithPath: "/usr/bin/fusermount3")
                p.arguments = force ? ["-u", "-z", mp] : ["-u", mp]
                try p.run()
                p.waitUntilExit()
                if p.terminationStatus != 0 { throw fail("fusermount3 could not unmount \(mp)") }
            } else if e == EBUSY {
                throw fail("\(mp) is busy (a process has its working directory or a file there); leave it, or use --force")
            } else {
                throw fail("cannot unmount \(mp): \(String(cString: strerror(e)))")
            }
        }
        guard let record else { return }
        // The daemon commits and exits after the kernel lets go of the mount; wait for it.
        let deadline = Date().addingTimeInterval(force ? 10 : 120)
        while processAlive(record.pid) && Date() < deadline {
            usleep(20_000)
        }
        if processAlive(record.pid) {
            if force { print("modelfs: \(mp) detached; the daemon (pid \(record.pid)) exits once its last open file is closed"); return }
            throw fail("the daemon of \(mp) (pid \(record.pid)) did not exit; see \(record.dataDir)/modelfs.log")
        }
    }
}

func openHandles(_ record: MountRecord) -> Int {
    guard let data = try? ControlServer.request(record.socket, "status"),
          let s = try? JSONDecoder().decode(MountStatus.self, from: data) else { return 0 }
    return s.openHandles
}

/// True while `pid` runs (a zombie — exited, not yet reaped by its parent — counts as gone).
func processAlive(_ pid: Int32) -> Bool {
    guard let stat = readProcFile("/proc/\(pid)/stat"),
          let close = stat.lastIndex(of: ")") else { return false }
    let state = stat[stat.index(close, offsetBy: 2)...].first
    return state != "Z" && state != "X"
}
