"""Trainers: one shared loop; pretraining (and later SFT/DPO) differ only in data, loss and metrics."""
