"""meshserve.serving"""
