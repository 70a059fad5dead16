"""The QEMU rig (``flctl qemu run|env|test``): appliances of the development image booted in QEMU.

rig.py      how one appliance is started: drives, network, provisioned data partition, labgrid environment
cli.py      the command line
"""
