"""Sample-quality metrics in the ADM evaluator's conventions: fid.py (Fréchet distance, Inception
Score from features/logits), inception.py (the FID Inception-v3 that produces them)."""
