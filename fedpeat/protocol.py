"""Names of the records exchanged between ServerApp and ClientApp (shared, no Flower import).

Query   (server -> device): ConfigRecord PLAN {"ask": "profile"}
Reply   (device -> server): ConfigRecord PROFILE {"partition-id", "num-partitions", "memory-mb"
                            (-1: unknown, the server uses its devices= profile), "compute",
                            "holds" (comma-joined digests of cached emulators)}
Train   (server -> device): ArrayRecord ADAPTER (global adapter, full-model layer indices),
                            ConfigRecord PLAN {"plan": Plan JSON, "server-round"},
                            ArrayRecord EMULATOR (only when the device lacks that emulator),
                            ArrayRecord RESIDUAL (aggregation=exact with strategy.residual: the
                            global adapter beyond the device's rank, frozen LoRA factors)
Reply   (device -> server): ArrayRecord ADAPTER (trained adapter), MetricRecord METRICS
                            {"num-examples", "train_loss", "train_s", "train_tokens", "peak_mem_mb"}
Evaluate (server -> device): ADAPTER, PLAN and RESIDUAL as for train
Reply   (device -> server): MetricRecord METRICS {"num-examples", "eval_loss", "eval_ppl",
                            "eval_tokens"}
"""

ADAPTER_KEY = "adapter"
PLAN_KEY = "plan"
METRICS_KEY = "metrics"
EMULATOR_KEY = "emulator"
PROFILE_KEY = "profile"
RESIDUAL_KEY = "residual"
