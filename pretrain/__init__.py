"""Self-supervised pretraining from video: frames -> optical flow -> AlexNet with the CPFS loss."""
