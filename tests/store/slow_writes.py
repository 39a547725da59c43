"""``kdcache ARGS...`` with a pause after every group an extraction writes:
``python tests/store/slow_writes.py SECONDS ARGS...``.

The process tests kill an extraction, or start a second one beside it, while groups are still
being written; the pause makes that window wide enough on a busy machine. It is set here, in
the test's own process, by wrapping the writer (production code has no test switch).
"""

from __future__ import annotations

import sys
import time

from kdcache.cli.main import app
from kdcache.store.writer import StoreWriter


def main() -> None:
    pause = float(sys.argv[1])
    write_group = StoreWriter.write_group

    def slow_write_group(self, *args, **kwargs):
        write_group(self, *args, **kwargs)
        time.sleep(pause)  # after the marker: the group counts as written, the next one waits

    StoreWriter.write_group = slow_write_group
    app(args=sys.argv[2:], prog_name="kdcache")


if __name__ == "__main__":
    main()
