"""The QEMU rig (``flctl qemu run|env|test``): appliances of the development image booted in QEMU.

rig.py      how one appliance is started: drives, network, provisioned data partition, labgrid environment
guests.py   the guests `flctl qemu run` starts, and how they are powered off
qmp.py      one QMP command over QEMU's unix socket
cli.py      the command line
"""
