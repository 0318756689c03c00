"""Resident memory of the current process, for the benchmark scripts (Linux /proc)."""


def peak_rss(reset: bool = False) -> int:
    """Peak RSS in bytes (VmHWM); reset=True restarts the measurement from the current RSS.
    getrusage's ru_maxrss cannot be reset and even carries the parent's peak across fork+exec
    (a parent that has just built a checkpoint would leak its peak into the child's figure)."""
    if reset:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    return _status('VmHWM')


def rss() -> int:
    """Current RSS in bytes (VmRSS)."""
    return _status('VmRSS')


def _status(key: str) -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ':'))
