"""Pure Attend-and-Excite math: no ComfyUI imports, runs on plain torch tensors.

Modules:
    smoothing  -- the reference Gaussian kernel and map smoothing
    loss       -- token-slot selection, re-softmax, per-subject maxima, the A&E loss
    schedule   -- guided steps, step sizes and refinement points as fractions of a schedule
    step       -- the latent update in ComfyUI's x-space
    tokens     -- subject words -> cross-attention key indices, token tables
    record     -- the per-run attention record (what the visualizer and metrics read)
    heatmap    -- turning maps into coloured, labelled overlays
    metrics    -- the paper's evaluation metrics (CLIP templates, similarities, neglect rate)
    guidance   -- the one module that runs autograd (the gradient island)
"""
