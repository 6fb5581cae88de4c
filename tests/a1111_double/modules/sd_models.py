"""Double of modules/sd_models.py (A1111 1.10): the checkpoint list and the loaded model's moves."""

from . import devices

checkpoints_list = {}  # title -> CheckpointInfo


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        self.title = filename


class SdModelData:
    def __init__(self):
        self.sd_model = None  # nothing loaded yet; A1111's shared.sd_model would load one on access


model_data = SdModelData()


def unload_model_weights(sd_model=None, info=None):
    (sd_model or model_data.sd_model).to(devices.cpu)  # send_model_to_cpu
    return sd_model


def send_model_to_device(m):
    m.to(devices.device)
