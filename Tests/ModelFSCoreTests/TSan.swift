#if MODELFS_TSAN
import ModelFSCore
// ThreadSanitizer cannot see Synchronization.Mutex on Linux (a futex): TSan builds use
// TrackedMutex, a pthread lock it sees (ModelFSCore/Concurrency.swift).
typealias Mutex = TrackedMutex
#endif
