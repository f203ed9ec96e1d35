"""Run an exported model.onnx with onnxruntime, behind the interface predict_proba already uses.

    model, tokenizer, info = load_onnx("out/sst2-export", "onnx")        # or "onnx-int8": model.int8.onnx

export.py --onnx writes model.onnx (the float graph: input_ids, attention_mask, token_type_ids -> logits,
batch and length dynamic) and model.int8.onnx (onnxruntime's dynamic quantization: int8 weights, activations
quantized on the fly) beside the folder's own weights. The tokenizer and labels.json are the folder's, so
tokenization, batching and probabilities are exactly predict.py's; only the forward pass changes hands.
"""
from __future__ import annotations

import os

import torch

RUNTIMES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}       # --runtime -> the file it runs
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class OnnxClassifier:
    """An onnxruntime session that looks like our models to `finetuned.infer`: called with the padded batch
    (torch tensors), it returns the logits as a torch tensor; it is always in eval mode, on the CPU."""

    training = False

    def __init__(self, path: str, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ValueError(f"{path}: running ONNX needs the onnxruntime package (pip install onnxruntime)") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = options.inter_op_num_threads = threads
        self.path = path
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        (logits,) = self.session.run(None, {k: v.cpu().numpy() for k, v in feed.items()})
        return torch.from_numpy(logits)                                     # (B, num_outputs)

    def parameters(self):                       # infer() reads the device from the first parameter
        yield torch.empty(0)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self


def load_onnx(folder: str, runtime: str = "onnx", threads: int | None = None):
    """(OnnxClassifier, tokenizer, info) for a folder that export.py --onnx wrote."""
    from finetuned import FinetuneError, folder_tokenizer, read_info
    path = os.path.join(folder, RUNTIMES[runtime])
    if not os.path.isfile(path):
        raise FinetuneError(f"{path}: not found (write it with: python export.py SRC --out {folder} --onnx)")
    info = read_info(folder)
    return OnnxClassifier(path, threads), folder_tokenizer(folder, info), info
