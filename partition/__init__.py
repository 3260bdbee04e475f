"""meshserve.partition"""
