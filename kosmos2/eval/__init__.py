"""Evaluation harness: the official Kosmos-2 benchmark protocols through the one predictor API.

    metrics.py       REC accuracy (first / any / mean box), phrase-grounding R@k (ANY-box); IoU from grounding
    runner.py        batched inference through the predictor, resumable JSON Lines prediction cache
    refcoco.py       RefCOCO / RefCOCO+ / RefCOCOg: refer pickles or MDETR json; REC and REG
    flickr30k.py     Flickr30k Entities: official XML + Sentences or MDETR json; phrase grounding, captioning
    synthetic.py     the synthetic world's held-out splits, every task; or REC/phrase samples (JSONL)
    text_metrics.py  CIDEr / METEOR / BLEU-4 / ROUGE-L through pycocoevalcap
    report.py        metrics.json, records.jsonl, report.md, plots, sample sheet
    cli.py           `kosmos2 eval refcoco | flickr30k | synthetic`

Nothing heavy is imported here; docs/EVAL.md explains the datasets and the paper's numbers.
"""
