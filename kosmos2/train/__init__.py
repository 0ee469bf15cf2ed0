"""Training: one general loop, and recipes that plug into it.

    config.py       TrainConfig: the loop's settings (a dataclass a recipe extends); --set overrides
    loop.py         TrainTask + fit(): steps, micro-batches, LR schedule, EMA, checkpoints + resume, JSONL
                    log, progress bar, evaluation with keep-best, DDP under torchrun
    optim.py        AdamW (+ Muon via kosmos2/muon.py) and the warm-up + cosine schedule
    loss.py         the next-token loss with SPEC §3's mask
    prefetch.py     batches made ahead in a thread or worker processes
    distributed.py  rank / world size under torchrun, the collectives the loop uses
    export.py       a trained model as a Hugging Face layout folder
    cli.py          `kosmos2 train`
    recipes/        synthetic.py: the synthetic world (the built-in default model), with its batches,
                    initialisation, slot read-out and shared-prefix decoder pass

Nothing here is imported by `import kosmos2`; torch is imported by the modules that train.
"""
