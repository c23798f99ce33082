"""The ECIF engine: pure tensor math for the bilinear CLIP head, no I/O.

contrastive: InfoNCE and removal terms on logits; batches: the recorded partition; head: the
objective, gradient, Hessian-vector products and dense Hessian; fit: damped Newton or
L-BFGS; inverse_hessian: exact, CG and EK-FAC solves; influence: the one-pass scores and
per-pair gradients.
"""
