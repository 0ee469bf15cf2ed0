"""Recipes: what to train and on what (a model, its batches, its loss), each handing a TrainTask to
kosmos2/train/loop.py. synthetic.py makes the built-in default model."""
