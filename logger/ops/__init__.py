"""One gradient builder per op: the per-example gradient math of each op family, in one place.

The module rules (:mod:`gradcoh.logger.layers`) and the op-by-op use tracker (:mod:`gradcoh.logger.uses`) both build
their per-example gradients here; they differ only in how they find the op's inputs and output gradient (a module's
call, or an op whose batch layout was followed). Every builder takes tensors with the examples on dimension 0 and
returns a per-example gradient form (:class:`~gradcoh.logger.grads.Dense`, :class:`~gradcoh.logger.grads.Factored`
or :class:`~gradcoh.logger.grads.Composite`) in the matrix view of the parameters it covers.

* :mod:`.linear` — ``y = x Wᵀ + b`` and ``y = x W + b`` (any leading dimensions), and the bias gradient ``Σ_t δ_t``;
* :mod:`.conv` — 1-, 2- and 3-D convolutions (im2col factors, or the per-example weight gradient in one kernel
  call);
* :mod:`.embedding` — lookups ``W[idx]`` (padding index, gradient scaled by frequency);
* :mod:`.norm` — ``y = x̂·w + b`` of the normalisation ops, with ``x̂`` from each op's own kernel.
"""
