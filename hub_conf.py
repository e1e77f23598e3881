"""Entry point of the VehicleNet model package: ``create_network`` builds the network
(Ascend when present) and loads the sha256-verified published weights in one call."""
from vehiclenet.model.factory import create_network

__all__ = ["create_network"]
