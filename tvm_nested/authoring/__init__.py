"""Making nested models: level maps, PyTorch nesting helpers (``nn``), nested pruning and training,
ONNX nesting, and the model zoo. Import the submodules themselves (``from tvm_nested.authoring import
nn``): most need torch, an optional dependency, so this package re-exports nothing."""
