"""The client side: what runs on a data owner's machine.

`runtime.py` (the model with LoRA, the client's tokenized data, its state between rounds),
`train.py` (`train_local`, the one training loop) and `batching.py` (batch plans, collation,
token losses).
"""
