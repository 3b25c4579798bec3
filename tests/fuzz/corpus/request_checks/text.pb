
r-1Hello there"
333?fff?(:

HÿÿÿÿÿÿÿÿÿRgemma-4