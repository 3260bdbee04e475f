"""meshserve.model"""
