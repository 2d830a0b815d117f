; One q8_0 row: nb blocks of 34 bytes (fp16 d, 32 int8 codes; w = d * q). The 32 lanes of
; %acc each sum d * q * x over the blocks; one horizontal sum at the end of the row.
; `PREFETCH(%ptr: offsets)` lines are expanded by cpu_gguf._expand_prefetch before parsing.

define float @mistralpy_q8_0_row(i64 %rowa, i64 %xa, i64 %nb) {
entry:
  %row = inttoptr i64 %rowa to ptr
  %x = inttoptr i64 %xa to ptr
  br label %loop
loop:
  %b = phi i64 [0, %entry], [%b1, %loop]
  %acc = phi <32 x float> [zeroinitializer, %entry], [%acc1, %loop]
  %off = mul i64 %b, 34
  %dp = getelementptr i8, ptr %row, i64 %off
PREFETCH(%dp: 0)
  %dh = load half, ptr %dp, align 1
  %d = fpext half %dh to float
  %qp = getelementptr i8, ptr %dp, i64 2
  %q = load <32 x i8>, ptr %qp, align 1
  %qf = sitofp <32 x i8> %q to <32 x float>
  %xo = mul i64 %b, 32
  %xp = getelementptr float, ptr %x, i64 %xo
  %xv = load <32 x float>, ptr %xp, align 4
  %p = fmul <32 x float> %qf, %xv
  %d0 = insertelement <32 x float> poison, float %d, i64 0
  %dv = shufflevector <32 x float> %d0, <32 x float> poison, <32 x i32> zeroinitializer
  %acc1 = call <32 x float> @llvm.fma.v32f32(<32 x float> %p, <32 x float> %dv, <32 x float> %acc)
  %b1 = add i64 %b, 1
  %done = icmp eq i64 %b1, %nb
  br i1 %done, label %exit, label %loop
exit:
  %s = call reassoc float @llvm.vector.reduce.fadd.v32f32(float 0.0, <32 x float> %acc1)
  ret float %s
}
declare <32 x float> @llvm.fma.v32f32(<32 x float>, <32 x float>, <32 x float>)
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)
declare float @llvm.vector.reduce.fadd.v32f32(float, <32 x float>)
