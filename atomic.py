"""One way to write a file: to a temporary name beside it, flushed to disk, then renamed over the real name.
A crash or an error mid-write never leaves a torn file under the real name (the last good checkpoint, model
or predictions file survives), and never a stray temporary one.

    with atomic_write("out/checkpoint.pt") as tmp:
        torch.save(state, tmp)
"""
import contextlib
import os


@contextlib.contextmanager
def atomic_write(path):
    """Yields the temporary path to write; on success it replaces `path`, on an exception it is removed."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
