"""The ServerApp path against an in-process grid, as a process of its own (which a test may kill).

python -m tests.serve_inprocess RUN_DIR "OVERRIDES" NUM_NODES
"""

from __future__ import annotations

import sys
from pathlib import Path

from flwr.supercore.task_identity import TaskIdentity

from bench.inprocess import InProcessGrid
from fedpeat.config import compose
from server_app.app import _run


def main() -> None:
    run_dir, overrides, nodes = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    # What the ServerApp runtime sets before messages may be built.
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = 1, 1, 0
    run_dir.mkdir(parents=True, exist_ok=True)
    _run(InProcessGrid(nodes), compose(overrides), run_dir)


if __name__ == "__main__":
    main()
