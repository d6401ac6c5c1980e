"""xylen model server: one tree model behind a typed gRPC contract, served from ONNX sessions."""
