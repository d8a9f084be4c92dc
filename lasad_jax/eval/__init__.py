"""Sample-quality metrics in the ADM evaluator's conventions (fid.py). The Inception-v3 feature
network is not ported yet; these functions take features computed elsewhere."""
