"""What fits the alert to one clinic: its threshold in force, calibration on its own labelled
photos, confirmed outcomes, reviews, and the drift of its alert rate."""
