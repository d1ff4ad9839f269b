"""Run every benchmark: `python -m bench` (make bench). Results go to bench/results/."""

from bench import model_load

if __name__ == "__main__":
    model_load.main()
