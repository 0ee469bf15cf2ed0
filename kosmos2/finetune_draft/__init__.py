"""Draft home of `kosmos2 finetune` until the training package (kosmos2/train/) lands."""
