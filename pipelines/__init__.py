"""Ray code: labelling and evaluation pipelines (Ray Data), fine-tuning (Ray Train), storage helpers."""
