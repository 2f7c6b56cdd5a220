"""The paper's audio-visual job: ResNet-18 audio and visual encoders on CREMA-D or
Kinetics-Sounds, trained through the regulator (``python -m trainers.av``)."""
