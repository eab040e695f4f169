"""Ray Train + DeepSpeed training phases (SFT / CFT, DPO / S-DPO) with LoRA.

Public API: `sprec_ray.train.phases.run_fit`, `Stage`, `PhaseResult`. Modules: `losses` (pure
tensor losses), `batching` (tokenise, bucket, collate), `engine` (LoRA model on DeepSpeed or DDP),
`objectives` (per-phase micro-batch loss), `loop` (the Ray Train worker), `checkpointing`, `tracking`.
"""
