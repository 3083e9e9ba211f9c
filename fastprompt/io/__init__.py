"""File-system helpers: atomic writes with unique temporary names, and clean-up of dead writers' leftovers."""
from fastprompt.io.atomic import atomic_write_bytes, clean_orphans, fsync_dir, pid_alive, temp_name

__all__ = ["atomic_write_bytes", "clean_orphans", "fsync_dir", "pid_alive", "temp_name"]
