"""Run every benchmark: `python -m bench` (make bench). Results go to bench/results/."""

import sys

from bench import emulator_step, merged_forward, model_load, quant_memory

if __name__ == "__main__":
    model_load.main()
    sys.argv = sys.argv[:1]
    emulator_step.main()
    quant_memory.main()
    merged_forward.main()
