"""Who takes part each round and with which emulator: the edge-system environment (cost and
progress model), PPO, the controllers, the online control inside a run, and the pre-training
tool (`python -m strategies.control pretrain|compare`)."""
