"""sparseprune"""
