"""Models: timm backbones (``backbone``), the stage-1 slice classifier (``slice_classifier``) and the
stage-2 sequence head (``sequence``). Import the submodules directly."""
