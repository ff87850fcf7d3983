"""marn_fast: fast, exact MARN (Multitask Balanced and Recalibrated Network) for ICD coding.

    from marn_fast import MARN, MARNConfig
    model = MARN(MARNConfig(vocab_size=50_000, num_icd=8921, num_ccs=295))
    out = model(tokens, lengths)                     # MARNOutput(icd_logits, ccs_logits)
    loss = model.compute_loss(out, icd_targets, ccs_targets)

`LAAT(LAATConfig(...))` is the LAAT model on the same interface; `marn_fast.nn.LabelWiseAttention`
is the label-wise attention head (MARN, CAML, LAAT/PLM-ICD styles) for any encoder.
"""
from .config import LAATConfig, MARNConfig
from .laat import LAAT
from .model import MARN, MARNOutput

__version__ = "0.1.0"
__all__ = ["LAAT", "LAATConfig", "MARN", "MARNConfig", "MARNOutput", "__version__"]
