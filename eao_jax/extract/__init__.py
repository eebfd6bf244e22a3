"""Feature extraction: the backbones and recipes that turn video files into the features the model
reads (ResNet-152 2D at 1/s, ResNeXt-101 3D at 1.5/s, 40-band log-mel audio at 100 frames/s, S3D,
CLIP ViT-B/32), their converters from the public PyTorch checkpoints, and the extraction job.
"""
