"""The daily report: what came in on one local day, suspected melanoma first."""
