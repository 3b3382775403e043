"""LitServe with dynamic batching (``PEER_MAX_BATCH`` images, ``PEER_BATCH_WAIT_MS``), one
inference worker on the CPU. ``python server_litserve.py PORT``."""

from __future__ import annotations

import sys

import common
import litserve as ls
import numpy as np


class Resnet(ls.LitAPI):
    def setup(self, device):
        self.session = common.session()

    def decode_request(self, request):
        upload = request["file"]
        data = upload.file.read() if hasattr(upload, "file") else upload
        return common.decode(data)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        return common.predict(self.session, x)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return output


if __name__ == "__main__":
    api = Resnet(max_batch_size=common.MAX_BATCH, batch_timeout=common.BATCH_WAIT_MS / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(port=int(sys.argv[1]), log_level="warning", generate_client_file=False)
