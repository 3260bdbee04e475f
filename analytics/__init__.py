"""meshserve.analytics"""
