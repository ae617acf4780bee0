// The SM a thread runs on, for calibration/kernels/occupier.py (linked into Numba kernels with the C ABI).
extern "C" __device__ int tiersim_smid() {
    unsigned int id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    return (int)id;
}
