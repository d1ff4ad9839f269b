"""Names of the records exchanged between ServerApp and ClientApp (shared, no Flower import).

Train message  (server -> device): ArrayRecord ADAPTER (global adapter), ConfigRecord PLAN
                                   {"plan": Plan JSON, "server-round": int}
Train reply    (device -> server): ArrayRecord ADAPTER (trained adapter), MetricRecord METRICS
                                   {"num-examples", "train_loss", "train_s", "train_tokens",
                                    "peak_mem_mb"}
Evaluate reply (device -> server): MetricRecord METRICS
                                   {"num-examples", "eval_loss", "eval_ppl", "eval_tokens"}
"""

ADAPTER_KEY = "adapter"
PLAN_KEY = "plan"
METRICS_KEY = "metrics"
