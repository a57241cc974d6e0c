"""What every stage may see with: the one detector (YOLOX on onnxruntime), the offline backbones
and the photo embedding. Core, so the filter, dedup and search stages share one copy of each."""
