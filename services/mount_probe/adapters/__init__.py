"""The mount probe's outside world: Linux syscalls through ctypes and the sandbox process."""
