"""meshserve.protos"""
