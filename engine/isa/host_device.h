// MEGASERVE_HOST_DEVICE: marks plain functions that host C++ and CUDA device code both call.
#pragma once

#if defined(__CUDACC__)
#define MEGASERVE_HOST_DEVICE __host__ __device__
#else
#define MEGASERVE_HOST_DEVICE
#endif
